-- The features whose code best tells what carries a concept from what does not, ranked by AUROC
-- on the run's select split at patch level (a patch's code vs its labels) or image level (an
-- image's highest patch code vs its labels). Next to the ranking score: the best AUROC any
-- feature reaches on the concept shuffled across images (control_auroc, same level and split),
-- then the report split's AUROC, and its precision and recall at the threshold chosen on the
-- select split (precision_at_select, recall_at_select: no tuning on the report split); the
-- report split's own best-F1 precision and recall, an optimistic oracle, as oracle_precision and
-- oracle_recall; and how often each feature fires.
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

selecting as (
    select
        feature_labels.run,
        feature_labels.feature,
        feature_labels.label,
        case when checked.level = 'image' then image_auroc else auroc end as select_auroc
    from feature_labels
    cross join checked
    where label = $label
        and ($run is null or run = $run)
        and is_select_split
),

reporting as (
    select * from feature_labels
    where label = $label
        and ($run is null or run = $run)
        and is_report_split
),

controls as (
    select
        label_controls.run,
        case
            when checked.level = 'image' then label_controls.control_image_auroc
            else label_controls.control_auroc
        end as control_auroc
    from label_controls
    cross join checked
    inner join runs
        on label_controls.run = runs.run
        and label_controls.split is not distinct from runs.select_split
    where label_controls.label = $label
),

final as (
    select
        selecting.run,
        selecting.feature,
        selecting.label,
        runs.select_split,
        selecting.select_auroc,
        controls.control_auroc,
        runs.report_split,
        reporting.auroc,
        reporting.precision_at_select,
        reporting.recall_at_select,
        reporting.precision as oracle_precision,
        reporting.recall as oracle_recall,
        reporting.mean_in,
        reporting.mean_out,
        reporting.n_pos,
        reporting.image_auroc,
        reporting.image_precision_at_select,
        reporting.image_recall_at_select,
        reporting.image_precision as oracle_image_precision,
        reporting.image_recall as oracle_image_recall,
        features.freq,
        features.max_act
    from selecting
    left join runs
        on selecting.run = runs.run
    left join reporting
        on selecting.run = reporting.run
        and selecting.feature = reporting.feature
    left join controls
        on selecting.run = controls.run
    left join features
        on selecting.run = features.run
        and selecting.feature = features.feature
    order by
        selecting.select_auroc desc nulls last,
        selecting.run,
        selecting.feature
    limit $limit
)

select * from final
