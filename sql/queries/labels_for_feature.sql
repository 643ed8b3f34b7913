-- Every concept scored for one feature, best AUROC first: what the feature seems to detect.
-- param run: stats run name, e.g. topk_k16
-- param feature integer: feature index
with selected as (
    select * from feature_labels
    where run = $run
        and feature = $feature
),

final as (
    select
        label,
        auroc,
        mean_in,
        mean_out,
        mean_diff,
        n_pos
    from selected
    order by
        auroc desc nulls last,
        label
)

select * from final
