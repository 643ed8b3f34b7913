-- The nearest features of one feature in the same SAE by decoder cosine, each with the label it
-- detects best (patch AUROC on the run's report split) and how often it fires.
-- param run: stats run name
-- param feature integer: feature index
with selected as (
    select * from feature_neighbors
    where run = $run
        and feature = $feature
),

best_label as (
    select
        run,
        feature,
        arg_max(label, auroc) as best_label,
        max(auroc) as best_auroc
    from feature_labels
    where run = $run
        and is_report_split
        and feature in (select neighbor from selected)
    group by all
),

final as (
    select
        selected.rank,
        selected.neighbor,
        selected.cosine,
        best_label.best_label,
        best_label.best_auroc,
        features.freq
    from selected
    left join best_label
        on selected.run = best_label.run
        and selected.neighbor = best_label.feature
    left join features
        on selected.run = features.run
        and selected.neighbor = features.feature
    order by selected.rank
)

select * from final
