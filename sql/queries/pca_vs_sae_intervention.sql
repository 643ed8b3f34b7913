-- Does editing the best PCA direction move a concept as much as editing its best SAE feature?
-- One row per (backbone, concept) at one strength (compare-intervene step,
-- saev_core.compare_intervene): the SAE feature's and the PCA direction's mean change of the
-- concept's logit side by side, each with its bootstrap 95% CI, the mean |change| of the other
-- concepts' logits (specificity), and the norm-matched random-direction controls of each
-- (random_*: the SAE edit's, as the demo's direction control; random_pca_*: the PCA edit's).
-- The two arms are not dose-matched (each clamps to strength x its own max), so the headline is
-- control-adjusted: adj_diff = (pca - random_pca) - (sae - random_sae), paired over the same
-- images, with its CI, two-sided sign-flip p (adj_diff_p) and that p Holm-adjusted over every
-- concept x strength of the run (p_adjusted); sae_adj_* / pca_adj_*: each arm beyond its own
-- control. raw_diff*: pca - sae unadjusted, which mixes the direction's effect with its dose.
-- Dose: *_dx_norm is the mean |change of x| over the *_n_tokens_edited tokens the edit changed
-- (at strength 0 only those where the unit is positive), *_dx_norm_all over all n_tokens tokens
-- of the images; *_per_dx: the effect per unit of *_dx_norm_all.
-- stronger: which edit moves the concept further beyond its control the way the clamp pushes it
-- (down for a strength <= 0): its adjusted CI excludes 0 and p_adjusted < alpha (0.05), else
-- level; where it says pca or level, the SAE does not beat the PCA direction.
-- Needs --db warehouse/compare.duckdb.
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
        sae.adj_delta as sae_adj_delta,
        sae.adj_lo as sae_adj_lo,
        sae.adj_hi as sae_adj_hi,
        pca.adj_delta as pca_adj_delta,
        pca.adj_lo as pca_adj_lo,
        pca.adj_hi as pca_adj_hi,
        pca.adj_diff,
        pca.adj_diff_lo,
        pca.adj_diff_hi,
        pca.adj_diff_p,
        pca.p_adjusted,
        pca.alpha,
        case
            when pca.adj_diff_lo is null or pca.adj_diff_hi is null then 'level'
            when pca.p_adjusted is null or not (pca.p_adjusted < pca.alpha) then 'level'
            when sae.strength <= 0 and pca.adj_diff_hi < 0 then 'pca'
            when sae.strength <= 0 and pca.adj_diff_lo > 0 then 'sae'
            when sae.strength > 0 and pca.adj_diff_lo > 0 then 'pca'
            when sae.strength > 0 and pca.adj_diff_hi < 0 then 'sae'
            else 'level'
        end as stronger,
        pca.raw_diff,
        pca.raw_diff_lo,
        pca.raw_diff_hi,
        pca.raw_diff_p,
        sae.dx_norm as sae_dx_norm,
        pca.dx_norm as pca_dx_norm,
        sae.dx_norm_all as sae_dx_norm_all,
        pca.dx_norm_all as pca_dx_norm_all,
        sae.n_tokens_edited as sae_n_tokens_edited,
        pca.n_tokens_edited as pca_n_tokens_edited,
        sae.n_tokens,
        sae.delta_per_dx as sae_delta_per_dx,
        pca.delta_per_dx as pca_delta_per_dx,
        sae.adj_delta_per_dx as sae_adj_delta_per_dx,
        pca.adj_delta_per_dx as pca_adj_delta_per_dx,
        sae.other_abs_delta as sae_other_abs_delta,
        pca.other_abs_delta as pca_other_abs_delta,
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
)

select * from final
order by backbone, concept
