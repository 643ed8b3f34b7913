-- For every concept and run, the single feature with the highest patch-level AUROC on the run's
-- select split (ties: the lower feature index): the candidate to inspect and to edit for that
-- concept. Its scores are those of the report split; control_auroc is the best AUROC any feature
-- reaches on the concept shuffled across images (chance for the best of d_sae features), and
-- select_margin = select_auroc - control_auroc, the fair comparison (both maxima on the select
-- split); precision_at_select and recall_at_select are the report split's at the threshold
-- chosen on the select split.
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
        leaders.select_split,
        leaders.select_auroc,
        leaders.control_auroc,
        leaders.select_margin,
        leaders.report_split,
        leaders.auroc,
        leaders.precision_at_select,
        leaders.recall_at_select,
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
