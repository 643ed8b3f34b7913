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
        -- the edit's 95% interval lies wholly below the control's: suppression lowered the
        -- concept's probability more than editing a random feature did
        delta_hi < control_lo as below_control,
        -- the intervals do not overlap, in either direction
        delta_hi < control_lo or delta_lo > control_hi as differs_from_control,
        -- mean |change| of the other concepts' probabilities: how specific the edit is
        other_abs_delta,
        features,
        layer,
        auroc,
        mlflow_run_id
    from source
)

select * from final
