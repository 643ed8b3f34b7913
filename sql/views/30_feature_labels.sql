-- One row per (run, feature, label): how well the feature's code scores "this patch carries the
-- label" (AUROC over patch tokens, from histograms: see saev_core.stats), and its mean code on
-- patches with and without the label.
with source as (
    select * from src_feature_labels
),

final as (
    select
        run,
        feature,
        label,
        auroc,
        mean_in,
        mean_out,
        mean_in - mean_out as mean_diff,
        n_pos
    from source
)

select * from final
