-- Each experiment's verdict against its controls: does the edit move its target more, in the
-- tested direction, than editing random features of the same frequency or moving the residual
-- stream as far in random directions, on the same images? One row per experiment: the edit's
-- effect (delta) with its interval, the controls' median and 95% range (control_lo/hi over
-- n_controls controls), the paired 95% interval of edit minus mean control (vs_control_lo/hi),
-- the permutation p-value before and after the run's multiplicity correction, the verdict
-- (supported when p_adjusted < alpha, the effect points the tested way and the edit's delta
-- lies beyond the controls' 95% range that way: beyond_controls) and the mean
-- |change| of every other concept (off_target_abs_delta). Supported ones first, then by p.
-- param run: intervention run name; every run when omitted (default null)
-- param strength double: only this edit strength; every strength when omitted (default null)
with selected as (
    select * from interventions
    where ($run is null or run = $run)
        and ($strength is null or strength = $strength)
),

final as (
    select
        run,
        hypothesis,
        concept,
        task,
        features,
        edit,
        scope,
        strength,
        select_split,
        eval_split,
        held_out,
        n_images,
        verdict,
        beyond_controls,
        alternative,
        round(delta, 3) as delta,
        round(delta_lo, 3) as delta_lo,
        round(delta_hi, 3) as delta_hi,
        n_controls,
        round(control_median, 3) as control_median,
        round(control_lo, 3) as control_lo,
        round(control_hi, 3) as control_hi,
        round(vs_control, 3) as vs_control,
        round(vs_control_lo, 3) as vs_control_lo,
        round(vs_control_hi, 3) as vs_control_hi,
        p_value,
        p_adjusted,
        correction,
        alpha,
        round(off_target_abs_delta, 4) as off_target_abs_delta,
        round(control_delta, 3) as random_feature,
        round(direction_delta, 3) as random_direction,
        round(noedit_delta, 4) as no_edit,
        round(target_change_rate, 3) as target_change_rate,
        round(other_change_rate, 3) as other_change_rate,
        round(miou_delta, 3) as miou_delta
    from selected
    order by
        verdict = 'supported' desc,
        p_adjusted,
        delta,
        run,
        hypothesis,
        strength
)

select * from final
