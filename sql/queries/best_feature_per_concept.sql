-- For every concept and run, the single feature with the highest patch-level AUROC (ties: the
-- lower feature index): the candidate to inspect and to edit for that concept.
-- param run: stats run name; every run when omitted (default null)
with leaders as (
    select * from label_leaders
    where ($run is null or run = $run)
        and feature is not null
),

final as (
    select
        leaders.run,
        leaders.label,
        leaders.feature,
        leaders.auroc,
        leaders.feature_image_auroc as image_auroc,
        leaders.mean_in,
        leaders.mean_out,
        leaders.n_pos,
        features.freq,
        features.max_act
    from leaders
    left join features
        on leaders.run = features.run
        and leaders.feature = features.feature
    order by
        leaders.run,
        leaders.label
)

select * from final
