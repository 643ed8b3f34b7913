-- Dose-response of every intervention: the change in the concept's probability at each edit,
-- scope and strength, with its interval, against the same edit on the frequency-matched random
-- features (control_feature: the first of them; control_delta: their mean change, with its
-- interval) and the range of all controls, and the experiment's verdict (see
-- intervention_controls).
-- param run: stats run name; every run when omitted (default null)
-- param concept: concept name; every concept when omitted (default null)
with selected as (
    select * from interventions
    where ($run is null or run = $run)
        and ($concept is null or concept = $concept)
),

final as (
    select
        run,
        experiment,
        hypothesis,
        concept,
        feature,
        edit,
        scope,
        strength,
        n_images,
        p_before,
        p_after,
        delta,
        delta_lo,
        delta_hi,
        control_feature,
        control_delta,
        control_delta_lo,
        control_delta_hi,
        n_controls,
        control_lo,
        control_hi,
        p_adjusted,
        verdict,
        other_abs_delta,
        off_target_abs_delta
    from selected
    order by
        run,
        hypothesis,
        concept,
        edit,
        scope,
        strength
)

select * from final
