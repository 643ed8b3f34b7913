-- One row per (backbone, concept, method, strength) of the compare-intervene step
-- (saev_core.compare_intervene): on the test images that carry the concept, every token at the
-- SAE's layer is edited and the concept's logit read from the classifier head. method sae: the
-- concept's best SAE feature clamped to strength x its max activation; pca: the projection on
-- the best PCA direction (centred on the PCA mean) clamped to strength x its max; random: the
-- edit of `control_for` with each token's change turned into a random direction of the same norm.
-- delta (ci_lo, ci_hi): mean change of the concept's logit with its bootstrap 95% CI over images;
-- other_delta: mean change of the other concepts' logits; diff_lo/diff_hi/diff_p (pca rows):
-- pca minus sae, paired over the same images (two-sided sign-flip p).
with source as (
    select * from src_compare_interventions
),

final as (
    select
        backbone,
        concept,
        method,
        control_for,
        unit,
        strength,
        layer,
        n_images,
        max_value,
        logit_before,
        delta,
        lo as ci_lo,
        hi as ci_hi,
        other_delta,
        other_abs_delta,
        dx_norm,
        n_directions,
        diff,
        diff_lo,
        diff_hi,
        diff_p,
        select_split,
        report_split
    from source
)

select * from final
