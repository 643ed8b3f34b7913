-- For every concept and run, the single feature with the highest patch-level AUROC: the
-- candidate to inspect and to edit for that concept.
-- param run: stats run name; every run when omitted (default null)
with ranked as (
    select
        run,
        label,
        feature,
        auroc,
        mean_in,
        mean_out,
        n_pos,
        row_number() over (
            partition by run, label
            order by auroc desc nulls last, feature
        ) as auroc_rank
    from feature_labels
    where $run is null or run = $run
),

best as (
    select * from ranked
    where auroc_rank = 1
),

final as (
    select
        best.run,
        best.label,
        best.feature,
        best.auroc,
        best.mean_in,
        best.mean_out,
        best.n_pos,
        features.freq,
        features.max_act
    from best
    left join features
        on best.run = features.run
        and best.feature = features.feature
    order by
        best.run,
        best.label
)

select * from final
