-- The concept x concept specificity matrix of a run's edits, one cell per row: the edited
-- concept (a matrix row) and the measured concept (a column), the change in the measured
-- concept's probability with its 95% interval, per strength. The diagonal (is_target) is the
-- edit's effect on its own concept; a specific edit has off-diagonal cells near 0. Segmentation
-- probes add the share of each class's pixels that change (change_rate) and the edited class's
-- target and other change rates.
-- param run: intervention run name; every run when omitted (default null)
-- param strength double: only this edit strength; every strength when omitted (default null)
with selected as (
    select * from intervention_specificity
    where ($run is null or run = $run)
        and ($strength is null or strength = $strength)
),

final as (
    select
        run,
        task,
        strength,
        edited_concept,
        concept,
        is_target,
        round(delta, 4) as delta,
        round(delta_lo, 4) as delta_lo,
        round(delta_hi, 4) as delta_hi,
        changed,
        round(change_rate, 4) as change_rate,
        round(target_change_rate, 4) as target_change_rate,
        round(other_change_rate, 4) as other_change_rate,
        hypothesis,
        experiment
    from selected
    order by
        run,
        strength,
        edited_concept,
        hypothesis,
        concept
)

select * from final
