-- Each experiment's effect on its target next to its three controls: is the edit's effect
-- larger than editing a random feature of the same frequency, or moving the residual stream
-- as far in a random direction? One row per experiment, strongest effects first.
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
        n_images,
        round(delta, 3) as delta,
        round(delta_lo, 3) as delta_lo,
        round(delta_hi, 3) as delta_hi,
        round(control_delta, 3) as random_feature,
        round(direction_delta, 3) as random_direction,
        round(noedit_delta, 4) as no_edit,
        round(target_change_rate, 3) as target_change_rate,
        round(other_change_rate, 3) as other_change_rate,
        round(miou_delta, 3) as miou_delta,
        below_controls
    from selected
    order by
        delta,
        run,
        hypothesis,
        strength
)

select * from final
