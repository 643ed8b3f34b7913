-- Does editing the best PCA direction move a concept as much as editing its best SAE feature?
-- One row per (backbone, concept) at one strength (compare-intervene step,
-- saev_core.compare_intervene): the SAE feature's and the PCA direction's mean change of the
-- concept's logit side by side, each with its bootstrap 95% CI, the mean |change| of the other
-- concepts' logits (specificity), the norm-matched random-direction controls of each (random_*:
-- the SAE edit's, as the demo's direction control; random_pca_*: the PCA edit's, which moves x
-- by the PCA edit's norms), and pca minus sae paired over the same images (diff, its CI and
-- two-sided sign-flip p).
-- stronger: which edit moves the concept further the way the clamp pushes it (down for a
-- strength <= 0) by that paired CI, or level when it holds 0; where it says pca or level, the
-- SAE does not beat the PCA direction. Needs --db warehouse/compare.duckdb.
-- param backbone: one backbone; every backbone when omitted (default null)
-- param strength double: the clamp strength, a multiple of each unit's max (default -2)
with selected as (
    select * from compare_interventions
    where ($backbone is null or backbone = $backbone)
        and strength = $strength
),

sae as (
    select * from selected where method = 'sae'
),

pca as (
    select * from selected where method = 'pca'
),

random_sae as (
    select * from selected where method = 'random' and control_for = 'sae'
),

random_pca as (
    select * from selected where method = 'random' and control_for = 'pca'
),

final as (
    select
        sae.backbone,
        sae.concept,
        sae.strength,
        sae.n_images,
        sae.unit as sae_feature,
        pca.unit as pca_component,
        sae.delta as sae_delta,
        sae.ci_lo as sae_lo,
        sae.ci_hi as sae_hi,
        pca.delta as pca_delta,
        pca.ci_lo as pca_lo,
        pca.ci_hi as pca_hi,
        random_sae.delta as random_delta,
        random_sae.ci_lo as random_lo,
        random_sae.ci_hi as random_hi,
        random_pca.delta as random_pca_delta,
        random_pca.ci_lo as random_pca_lo,
        random_pca.ci_hi as random_pca_hi,
        sae.other_abs_delta as sae_other_abs_delta,
        pca.other_abs_delta as pca_other_abs_delta,
        sae.dx_norm as sae_dx_norm,
        pca.dx_norm as pca_dx_norm,
        pca.diff,
        pca.diff_lo,
        pca.diff_hi,
        pca.diff_p,
        case
            when pca.diff_lo is null or pca.diff_hi is null then 'level'
            when sae.strength <= 0 and pca.diff_hi < 0 then 'pca'
            when sae.strength <= 0 and pca.diff_lo > 0 then 'sae'
            when sae.strength > 0 and pca.diff_lo > 0 then 'pca'
            when sae.strength > 0 and pca.diff_hi < 0 then 'sae'
            else 'level'
        end as stronger,
        sae.select_split,
        sae.report_split
    from sae
    inner join pca
        on sae.backbone = pca.backbone
        and sae.concept = pca.concept
        and sae.strength = pca.strength
    left join random_sae
        on sae.backbone = random_sae.backbone
        and sae.concept = random_sae.concept
        and sae.strength = random_sae.strength
    left join random_pca
        on sae.backbone = random_pca.backbone
        and sae.concept = random_pca.concept
        and sae.strength = random_pca.strength
    order by sae.backbone, sae.concept
)

select * from final
