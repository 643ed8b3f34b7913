-- Does the SAE find concepts that simpler bases of the same activations do not? Per backbone
-- and method (neuron, pca, ica, nmf, random, sae; saev_core.baselines), over the labels of the
-- kind asked for: the mean, min and max test AUROC of the method's best unit per label (chosen
-- on val), and on how many labels the method beats the SAE (n_better_than_sae: the paired
-- bootstrap CI of its AUROC minus the SAE's lies wholly above 0), loses to it
-- (n_worse_than_sae: wholly below 0) or cannot be told apart (n_level_with_sae): where the SAE
-- does not beat a baseline, n_better_than_sae and n_level_with_sae say so. Null on the SAE's row.
-- param kind: labels compared: concept (circle), concept_form (circle:word), form (word) or all (default concept)
-- param backbone: one backbone; every backbone when omitted (default null)
with checked as (
    select case when $kind in ('concept', 'concept_form', 'form', 'all') then $kind::varchar
        else error('sae_vs_baselines: kind must be concept, concept_form, form or all, got '
            || $kind) end as kind
),

forms as (
    select distinct backbone, form from compare_baselines where form is not null
),

rows as (
    select b.*
    from compare_baselines as b, checked
    where ($backbone is null or b.backbone = $backbone)
        and (
            checked.kind = 'all'
            or (checked.kind = 'concept_form' and b.form is not null)
            or (checked.kind = 'form' and b.form is null
                and b.label in (select form from forms where forms.backbone = b.backbone))
            or (checked.kind = 'concept' and b.form is null
                and b.label not in (select form from forms where forms.backbone = b.backbone))
        )
)

select
    backbone,
    method,
    count(*) as n_labels,
    avg(auroc_test) as mean_auroc,
    min(auroc_test) as min_auroc,
    max(auroc_test) as max_auroc,
    case when method <> 'sae' then count(*) filter (where diff_lo > 0) end as n_better_than_sae,
    case when method <> 'sae' then count(*) filter (where diff_hi < 0) end as n_worse_than_sae,
    case when method <> 'sae' then count(*) filter (where diff_lo <= 0 and diff_hi >= 0) end
        as n_level_with_sae
from rows
group by backbone, method
order by backbone, mean_auroc desc, method
