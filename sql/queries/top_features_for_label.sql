-- The features whose code best tells patches that carry a concept from those that do not,
-- ranked by patch-level AUROC, with how often and how strongly each fires.
-- param label: concept name, e.g. red
-- param run: stats run name; every run when omitted (default null)
-- param limit integer: rows to return (default 10)
with matches as (
    select * from feature_labels
    where label = $label
        and ($run is null or run = $run)
),

final as (
    select
        matches.run,
        matches.feature,
        matches.label,
        matches.auroc,
        matches.mean_in,
        matches.mean_out,
        matches.n_pos,
        features.freq,
        features.max_act
    from matches
    left join features
        on matches.run = features.run
        and matches.feature = features.feature
    order by
        matches.auroc desc nulls last,
        matches.run,
        matches.feature
    limit $limit
)

select * from final
