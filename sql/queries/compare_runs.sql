-- One row per run to compare SAEs: size, sparsity, reconstruction, dead and dense shares, and
-- how well its best feature per concept (chosen on the select split) detects that concept on the
-- report split (mean and minimum AUROC), next to the mean best AUROC of shuffled-label controls
-- (what the best of d_sae features reaches by chance: it grows with d_sae).
with best as (
    select
        run,
        label,
        auroc as best_auroc,
        control_auroc
    from label_leaders
),

concept_scores as (
    select
        run,
        count(*) as n_concepts,
        avg(best_auroc) as mean_best_auroc,
        min(best_auroc) as min_best_auroc,
        avg(control_auroc) as mean_control_auroc
    from best
    group by run
),

final as (
    select
        runs.run,
        runs.backbone,
        runs.layer,
        runs.arch,
        runs.d_model,
        runs.d_sae,
        runs.k,
        runs.l0,
        runs.fvu,
        runs.dead_frac,
        runs.dense_frac,
        runs.dense_frac_abs,
        concept_scores.n_concepts,
        concept_scores.mean_best_auroc,
        concept_scores.min_best_auroc,
        concept_scores.mean_control_auroc
    from runs
    left join concept_scores
        on runs.run = concept_scores.run
    order by runs.run
)

select * from final
