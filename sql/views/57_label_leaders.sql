-- One row per (run, label): the feature with the highest patch AUROC for the label and the one
-- with the highest image AUROC (ties: the lower feature index), both chosen on the run's select
-- split and scored on its report split, so that the reported AUROC carries no selection bias.
-- Next to each: control_auroc, the best AUROC any feature of the run reaches on the label's
-- shuffled-label control (labels permuted across the select split's images), what choosing the
-- best of d_sae features reaches by chance: compare leaders of runs of different width by the
-- margin over it. The fair comparison is `select_margin` = select_auroc - control_auroc (and
-- image_select_margin): the control is a maximum over features on the select split, and so is
-- select_auroc; the report split's `auroc` carries no selection and is not comparable with a
-- maximum. control_auroc_err bounds the control's own AUROC error. precision_at_select and
-- recall_at_select are the report split's at the threshold chosen on the select split. Precomputed, so that "which feature is this concept's?" is a look-up.
with selecting as (
    select
        run,
        label,
        feature,
        auroc,
        image_auroc
    from feature_labels
    where is_select_split
),

reporting as (
    select
        run,
        label,
        feature,
        auroc,
        image_auroc,
        mean_in,
        mean_out,
        n_pos,
        precision_at_select,
        recall_at_select,
        image_precision_at_select,
        image_recall_at_select
    from feature_labels
    where is_report_split
),

patch_best as (
    select
        run,
        label,
        arg_max(feature, [auroc, -feature]) as feature,
        max(auroc) as select_auroc
    from selecting
    where auroc is not null
    group by all
),

image_best as (
    select
        run,
        label,
        arg_max(feature, [image_auroc, -feature]) as image_feature,
        max(image_auroc) as image_select_auroc
    from selecting
    where image_auroc is not null
    group by all
),

controls as (
    select
        label_controls.run,
        label_controls.label,
        label_controls.control_auroc,
        label_controls.control_auroc_err,
        label_controls.control_image_auroc,
        label_controls.control_image_auroc_err
    from label_controls
    inner join runs
        on label_controls.run = runs.run
        and label_controls.split is not distinct from runs.select_split
),

labels as (
    select distinct
        run,
        label
    from feature_labels
),

final as (
    select
        labels.run,
        labels.label,
        runs.select_split,
        runs.report_split,
        patch_best.feature,
        -- the feature's patch AUROC on the report split, and on the split it was chosen on
        patch_report.auroc,
        patch_best.select_auroc,
        controls.control_auroc,
        controls.control_auroc_err,
        -- the fair comparison: both a maximum over features on the select split
        patch_best.select_auroc - controls.control_auroc as select_margin,
        -- on the report split, at the threshold the select split chose
        patch_report.precision_at_select,
        patch_report.recall_at_select,
        -- the patch-best feature's other scores, on the report split
        patch_report.image_auroc as feature_image_auroc,
        patch_report.mean_in,
        patch_report.mean_out,
        patch_report.n_pos,
        image_best.image_feature,
        image_report.image_auroc,
        image_best.image_select_auroc,
        controls.control_image_auroc,
        controls.control_image_auroc_err,
        image_best.image_select_auroc - controls.control_image_auroc as image_select_margin,
        image_report.image_precision_at_select,
        image_report.image_recall_at_select
    from labels
    left join runs
        on labels.run = runs.run
    left join patch_best
        on labels.run = patch_best.run
        and labels.label = patch_best.label
    left join reporting as patch_report
        on patch_best.run = patch_report.run
        and patch_best.label = patch_report.label
        and patch_best.feature = patch_report.feature
    left join image_best
        on labels.run = image_best.run
        and labels.label = image_best.label
    left join reporting as image_report
        on image_best.run = image_report.run
        and image_best.label = image_report.label
        and image_best.image_feature = image_report.feature
    left join controls
        on labels.run = controls.run
        and labels.label = controls.label
)

select * from final
