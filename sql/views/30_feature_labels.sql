-- One row per (run, feature, label): how well the feature's code tells what carries the label,
-- at patch level (the code on a patch vs the patch's labels) and at image level (the image's
-- highest patch code vs the image's labels). AUROC is exact, or within the proven bound
-- `auroc_err` of exact (<= 0.002 unless refinement was cut short; see saev_core.stats.assoc);
-- precision and recall are exact at the threshold with the best F1 (within `f1_err` of the best
-- over all thresholds), where "code >= threshold" predicts the label (threshold 0: "code > 0").
-- On each split that threshold is the split's own best: on the report split, `precision`,
-- `recall` and `f1` are an oracle (the cut is tuned on the data they score). The fair numbers
-- there are `precision_at_select` / `recall_at_select` / `f1_at_select` (and the image ones):
-- exact counts on this split at the threshold the select split chose for the same pair (on the
-- select split they equal its own precision and recall; null where no threshold was carried).
-- One block of rows per split the stats measured:
-- choose a feature on the run's select split (is_select_split), read its scores on the report
-- split (is_report_split); stats written before splits were kept apart have split null and count
-- as both.
with source as (
    select * from src_feature_labels
),

final as (
    select
        source.run,
        source.split,
        source.split is not distinct from runs.select_split as is_select_split,
        source.split is not distinct from runs.report_split as is_report_split,
        feature,
        label,
        auroc,
        mean_in,
        mean_out,
        mean_in - mean_out as mean_diff,
        n_pos,
        threshold,
        precision,
        recall,
        2 * precision * recall / nullif(precision + recall, 0) as f1,
        image_auroc,
        image_mean_in,
        image_mean_out,
        image_mean_in - image_mean_out as image_mean_diff,
        image_n_pos,
        image_threshold,
        image_precision,
        image_recall,
        2 * image_precision * image_recall / nullif(image_precision + image_recall, 0) as image_f1,
        auroc_err,
        f1_err,
        image_auroc_err,
        image_f1_err,
        precision_at_select,
        recall_at_select,
        2 * precision_at_select * recall_at_select
            / nullif(precision_at_select + recall_at_select, 0) as f1_at_select,
        image_precision_at_select,
        image_recall_at_select,
        2 * image_precision_at_select * image_recall_at_select
            / nullif(image_precision_at_select + image_recall_at_select, 0) as image_f1_at_select
    from source
    left join runs
        on source.run = runs.run
)

select * from final
