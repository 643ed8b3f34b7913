-- One row per experiment (hypothesis x edit strength): the change in the target's predicted
-- probability when the feature(s) are edited, with 95% bootstrap intervals over images, tested
-- against many controls measured on the same images: random features matched in frequency
-- (control_) and random directions of the same norm (direction_), plus the splice without edit
-- (noedit_). The verdict is a paired permutation test of the edit against the mean control,
-- adjusted for every hypothesis x strength of the run (see saev_core.verdicts). Rates are
-- fractions of predictions that flip.
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
        -- the split the effect is measured on (the features were chosen on select_split), and
        -- whether the two differ
        eval_split,
        held_out,
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
        -- mean over the other concepts of |their mean change| (null on rows written before it:
        -- other_abs_delta, a mean of per-image |change|, is a different quantity)
        off_target_abs_delta,
        -- the verdict: the edit against its n_controls controls on the same images, in the
        -- tested direction (alternative); vs_control_lo/hi: paired bootstrap 95% interval of
        -- edit minus mean control; p_adjusted: p_value after `correction` over the run;
        -- beyond_controls: the edit's delta lies beyond the controls' 95% range the tested way
        -- (below control_lo for a decrease, above control_hi for an increase, outside both for
        -- two-sided). supported = p_adjusted < alpha, delta and vs_control both the tested way,
        -- and beyond_controls (saev_core.verdicts.verdict). The correction covers the paired
        -- test against the controls' mean; beyond_controls is a fixed rule on their spread,
        -- not a corrected test (control_rank_p, the rank test's p, floors at 1 / (n + 1)).
        verdict,
        beyond_controls,
        alternative,
        n_controls,
        p_value,
        p_adjusted,
        correction,
        alpha,
        coalesce(vs_control, delta - control_delta) as vs_control,
        vs_control_lo,
        vs_control_hi,
        -- the controls' mean effects: median and 95% range, and the edit's rank among them
        control_median,
        control_lo,
        control_hi,
        control_rank_p,
        -- the random-feature control's own effect (the first control, or their summary)
        control_delta,
        control_delta_lo,
        control_delta_hi,
        control_target_change_rate,
        control_other_change_rate,
        direction_delta,
        direction_delta_lo,
        direction_delta_hi,
        direction_target_change_rate,
        noedit_delta,
        noedit_max_abs_dp,
        delta - control_delta as delta_vs_control,
        -- superseded by `verdict` (independent intervals, one control, one direction only);
        -- kept for results written before it: the edit's 95% interval lies wholly below the
        -- random-feature control's, and below the random-direction control's too
        delta_hi < control_delta_lo as below_control,
        delta_hi < control_delta_lo and delta_hi < direction_delta_lo as below_controls,
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
