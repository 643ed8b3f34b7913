-- One row per intervention setting: the change in the concept's predicted probability when the
-- feature is edited, with its interval, next to the same edit on a control feature.
with source as (
    select * from src_interventions
),

final as (
    select
        run,
        experiment,
        concept,
        feature,
        control_feature,
        edit,
        strength,
        scope,
        n_images,
        p_before,
        p_after,
        delta,
        delta_lo,
        delta_hi,
        control_delta,
        control_lo,
        control_hi,
        delta - control_delta as delta_vs_control,
        -- the two intervals do not overlap: the edit did something the control did not
        delta_hi < control_lo or delta_lo > control_hi as beats_control,
        mlflow_run_id
    from source
)

select * from final
