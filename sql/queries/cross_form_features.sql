-- Per backbone and concept: the SAE features that detect the concept in two or more of its forms
-- (filled, outline, word), i.e. with AUROC >= min_auroc on the report split (test) for each of
-- at least min_forms "<concept>:<form>" labels; n_features of them, the best (highest AUROC in
-- its weakest qualifying form) with its forms, and share_of_concepts: the share of the
-- backbone's concepts that have at least one such feature (the same on every row of a backbone).
-- Every concept gets a row, with n_features 0 where none qualifies.
-- param min_auroc double: AUROC a feature needs in each form (default 0.9)
-- param min_forms integer: forms it must reach that in (default 2)
-- param level: image (the image's highest patch code) or patch (default image)
-- param backbone: one backbone; every backbone when omitted (default null)
with checked as (
    select case when $level in ('image', 'patch') then $level::varchar
        else error('cross_form_features: level must be image or patch, got ' || $level) end
        as level
),

scores as (
    select
        run as backbone,
        feature,
        split_part(label, ':', 1) as concept,
        split_part(label, ':', 2) as form,
        case when checked.level = 'patch' then auroc else image_auroc end as auroc
    from feature_labels, checked
    where is_report_split
        and contains(label, ':')
        and ($backbone is null or run = $backbone)
),

concepts as (
    select distinct backbone, concept from scores
),

per_feature as (
    select
        backbone,
        concept,
        feature,
        list(form order by form) as forms,
        min(auroc) as min_auroc,
        count(*) as n_forms
    from scores
    where auroc >= $min_auroc
    group by backbone, concept, feature
    having count(*) >= $min_forms
),

per_concept as (
    select
        concepts.backbone,
        concepts.concept,
        count(per_feature.feature) as n_features,
        arg_max(per_feature.feature, (per_feature.min_auroc, -per_feature.feature)) as best_feature,
        arg_max(per_feature.forms, (per_feature.min_auroc, -per_feature.feature)) as best_forms,
        max(per_feature.min_auroc) as best_min_auroc,
        list(per_feature.feature order by per_feature.feature)
            filter (where per_feature.feature is not null) as features
    from concepts
    left join per_feature
        on per_feature.backbone = concepts.backbone
        and per_feature.concept = concepts.concept
    group by concepts.backbone, concepts.concept
)

select
    *,
    avg(case when n_features > 0 then 1.0 else 0.0 end) over (partition by backbone)
        as share_of_concepts
from per_concept
order by backbone, concept
