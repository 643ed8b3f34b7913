-- One row per experiment (hypothesis x edit strength): the change in the target's predicted
-- probability when the feature(s) are edited, with 95% bootstrap intervals over images, next to
-- three controls: the same edit on random features matched in frequency (control_), the edit's
-- change of the residual stream in a random direction of the same norm (direction_), and the
-- splice without edit (noedit_). Rates are fractions of predictions that flip.
with source as (
    select * from src_interventions
),

final as (
    select
        run,
        experiment,
        coalesce(hypothesis, concept) as hypothesis,
        concept,
        coalesce(task, 'classifier') as task,
        feature,
        features,
        control_feature,
        control_features,
        edit,
        relative,
        strength,
        scope,
        layer,
        -- the edited feature's AUROC on the stats' report split; it was chosen on select_split
        -- (select_auroc there), next to the best AUROC of the target's shuffled-label control
        auroc,
        select_split,
        select_auroc,
        report_split,
        control_auroc,
        n_images,
        p_before,
        p_after,
        delta,
        delta_lo,
        delta_hi,
        target_change_rate,
        target_change_lo,
        target_change_hi,
        other_change_rate,
        other_change_lo,
        other_change_hi,
        -- mean |change| of the other labels' probabilities: how specific the edit is
        other_abs_delta,
        control_delta,
        control_delta_lo as control_lo,
        control_delta_hi as control_hi,
        control_target_change_rate,
        control_other_change_rate,
        direction_delta,
        direction_delta_lo,
        direction_delta_hi,
        direction_target_change_rate,
        noedit_delta,
        noedit_max_abs_dp,
        delta - control_delta as delta_vs_control,
        -- the edit's 95% interval lies wholly below the random-feature control's
        delta_hi < control_delta_lo as below_control,
        -- ... and below the random-direction control's too
        delta_hi < control_delta_lo and delta_hi < direction_delta_lo as below_controls,
        -- the intervals do not overlap, in either direction
        delta_hi < control_delta_lo or delta_lo > control_delta_hi as differs_from_control,
        -- segmentation probes: mIoU against the masks, and the change of each class's share
        -- of the pixels (JSON: class -> change in fraction of the image)
        miou_before,
        miou_after,
        miou_delta,
        miou_delta_lo,
        miou_delta_hi,
        control_miou_delta,
        direction_miou_delta,
        class_pixel_change,
        dx_norm,
        mlflow_run_id
    from source
)

select * from final
