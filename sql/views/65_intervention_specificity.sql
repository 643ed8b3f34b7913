-- How specific each edit is: one row per experiment (hypothesis x edit strength) and measured
-- concept, the change in that concept's predicted probability when the edited concept's
-- feature(s) are edited, with its 95% bootstrap interval over images. Rows with
-- is_target = true are the edit's own effect (the diagonal of the concept x concept matrix).
-- For the segmentation probe, one class is intervened at a time; change_rate is the share of the
-- measured class's pixels whose prediction changes, target_change_rate / other_change_rate
-- those of the edited class's pixels and of the others'.
with source as (
    select * from src_intervention_specificity
),

-- the task (classifier, probe:segmentation) of each experiment, so that one strength's rows of
-- different tasks are not read as one matrix
tasks as (
    select distinct run, experiment, task from interventions
),

final as (
    select
        source.run,
        source.experiment,
        tasks.task,
        coalesce(hypothesis, edited_concept) as hypothesis,
        edited_concept,
        strength,
        concept,
        concept = edited_concept as is_target,
        delta,
        delta_lo,
        delta_hi,
        -- the interval excludes no change
        delta_lo > 0 or delta_hi < 0 as changed,
        -- segmentation: the share of this concept's pixels whose prediction changes, and the
        -- edited class's and the other classes' (the same on every row of the experiment)
        change_rate,
        target_change_rate,
        other_change_rate
    from source
    left join tasks on source.run = tasks.run and source.experiment = tasks.experiment
)

select * from final
