-- The semantic probe of the seed paper, per backbone and concept (a plain concept label such as
-- "circle", true whatever form the concept takes): the feature with the best image-level F1 on
-- the select split (val; ties: the lower feature), and its F1 on the report split (test) at the
-- threshold val chose, against a random feature: the mean test F1 of the other features and
-- p_value = (1 + #other features with test F1 >= the chosen one's) / (1 + #other features), the
-- exact p-value of "the chosen feature is no better than one drawn at random" (a feature with
-- no F1, never firing above the threshold, counts as F1 0). p_holm: Holm's adjustment over every
-- row returned; significant: p_holm < alpha.
-- param alpha double: significance level, after Holm over the rows returned (default 0.05)
-- param alive_only boolean: draw the random features among those that fire at all (default true)
-- param backbone: one backbone; every backbone when omitted (default null)
with concept_labels as (
    select distinct run, split_part(label, ':', 1) as label
    from feature_labels
    where contains(label, ':')
),

scores as (
    select
        fl.run as backbone,
        fl.label as concept,
        fl.feature,
        fl.is_select_split,
        fl.is_report_split,
        coalesce(case when fl.is_select_split then fl.image_f1 end, 0) as select_f1,
        coalesce(fl.image_f1_at_select, 0) as test_f1
    from feature_labels as fl
    join concept_labels as c
        on c.run = fl.run and c.label = fl.label
    left join features as f
        on f.run = fl.run and f.feature = fl.feature
    where ($backbone is null or fl.run = $backbone)
        and (not $alive_only or coalesce(f.freq, 0) > 0)
),

chosen as (
    select backbone, concept, arg_max(feature, (select_f1, -feature)) as feature,
        max(select_f1) as select_f1
    from scores
    where is_select_split
    group by backbone, concept
),

report as (
    select * from scores where is_report_split
),

tested as (
    select
        chosen.backbone,
        chosen.concept,
        chosen.feature,
        chosen.select_f1,
        any_value(r.test_f1) filter (where r.feature = chosen.feature) as test_f1,
        avg(r.test_f1) filter (where r.feature != chosen.feature) as random_f1,
        count(*) filter (where r.feature != chosen.feature) as n_random
    from chosen
    join report as r
        on r.backbone = chosen.backbone and r.concept = chosen.concept
    group by chosen.backbone, chosen.concept, chosen.feature, chosen.select_f1
),

with_p as (
    select
        tested.*,
        (1 + (select count(*) from report as r
              where r.backbone = tested.backbone and r.concept = tested.concept
                  and r.feature != tested.feature and r.test_f1 >= tested.test_f1))
            / (1 + n_random) as p_value
    from tested
),

ranked as (
    select
        *,
        row_number() over (order by p_value, backbone, concept) as rn,
        count(*) over () as m
    from with_p
),

holm as (
    select
        * exclude (rn, m),
        least(1.0, max((m - rn + 1) * p_value) over (order by rn rows unbounded preceding))
            as p_holm
    from ranked
)

select *, p_holm < $alpha as significant
from holm
order by backbone, concept
