-- The features whose code best tells what carries a concept from what does not, ranked by AUROC
-- at patch level (a patch's code vs its labels) or image level (an image's highest patch code vs
-- its labels), with precision and recall at the best-F1 threshold and how often each fires.
-- param label: concept name, e.g. red
-- param run: stats run name; every run when omitted (default null)
-- param level: rank by patch or image AUROC (default patch)
-- param limit integer: rows to return (default 10)
with checked as (
    select
        case
            when $level in ('patch', 'image') then $level
            else error('parameter level must be patch or image, got ' || coalesce($level, 'null'))
        end as level
),

matches as (
    select
        feature_labels.*,
        case when checked.level = 'image' then image_auroc else auroc end as ranked_auroc
    from feature_labels
    cross join checked
    where label = $label
        and ($run is null or run = $run)
),

final as (
    select
        matches.run,
        matches.feature,
        matches.label,
        matches.auroc,
        matches.precision,
        matches.recall,
        matches.mean_in,
        matches.mean_out,
        matches.n_pos,
        matches.image_auroc,
        matches.image_precision,
        matches.image_recall,
        features.freq,
        features.max_act
    from matches
    left join features
        on matches.run = features.run
        and matches.feature = features.feature
    order by
        matches.ranked_auroc desc nulls last,
        matches.run,
        matches.feature
    limit $limit
)

select * from final
