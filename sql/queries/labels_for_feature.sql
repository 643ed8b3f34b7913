-- Every concept scored for one feature on the run's report split, best AUROC first: what the
-- feature seems to detect.
-- param run: stats run name, e.g. topk_k16
-- param feature integer: feature index
with selected as (
    select * from feature_labels
    where run = $run
        and feature = $feature
        and is_report_split
),

final as (
    select
        label,
        split,
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
