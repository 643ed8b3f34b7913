-- One row per (backbone, concept, method, strength) of the compare-intervene step
-- (saev_core.compare_intervene): on the test images that carry the concept, every token at the
-- SAE's layer is edited and the concept's logit read from the classifier head. method sae: the
-- concept's best SAE feature clamped to strength x its max activation; pca: relu of the
-- projection on the best PCA direction (centred on the PCA mean) clamped to strength x its max,
-- so that, as for the ReLU SAE feature, a token with a negative projection is untouched at
-- strength 0; random: the edit of `control_for` with each token's change turned into a random
-- direction of the same norm.
-- delta (ci_lo, ci_hi): mean change of the concept's logit with its bootstrap 95% CI over images;
-- other_delta: mean change of the other concepts' logits; adj_delta (adj_lo, adj_hi): an arm's
-- delta minus its own random control's, per image.
-- pca rows: adj_diff (adj_diff_lo, adj_diff_hi, adj_diff_p) = (pca - random_pca) -
-- (sae - random_sae), paired over images (two-sided sign-flip p), the headline; p_adjusted: Holm
-- over every concept x strength; raw_diff*: pca - sae unadjusted (direction and dose mixed).
-- dx_norm: mean |change of x| over the n_tokens_edited tokens the edit changed; dx_norm_all: over
-- all n_tokens tokens of the edited images; *_per_dx: the effect per unit of dx_norm_all.
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
        adj_delta,
        adj_lo,
        adj_hi,
        dx_norm,
        dx_norm_all,
        n_tokens_edited,
        n_tokens,
        delta_per_dx,
        adj_delta_per_dx,
        n_directions,
        adj_diff,
        adj_diff_lo,
        adj_diff_hi,
        adj_diff_p,
        p_adjusted,
        alpha,
        raw_diff,
        raw_diff_lo,
        raw_diff_hi,
        raw_diff_p,
        select_split,
        report_split
    from source
)

select * from final
