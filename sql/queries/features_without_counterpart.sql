-- Features of one run that detect a concept but have no counterpart in another run: neither a
-- feature with a similar decoder direction nor one whose exemplar images overlap (for example a
-- concept one backbone's SAE isolates and the other's does not). Uses feature_matches. Detectors
-- are chosen on the run's select split; the auroc and image_auroc shown are the report split's.
-- param run: the run whose features are tested
-- param other_run: the run to look for counterparts in
-- param label: concept name, e.g. red
-- param min_auroc double: patch AUROC a feature needs to count as detecting the label (default 0.8)
-- param max_cos double: a partner with decoder cosine at or above this is a counterpart (default 0.7)
-- param max_overlap double: a partner with exemplar Jaccard at or above this is one (default 0.25)
with chosen as (
    select
        run,
        feature
    from feature_labels
    where run = $run
        and label = $label
        and is_select_split
        and auroc >= $min_auroc
),

detectors as (
    select
        feature_labels.run,
        feature_labels.feature,
        feature_labels.auroc,
        feature_labels.image_auroc
    from feature_labels
    inner join chosen
        on feature_labels.run = chosen.run
        and feature_labels.feature = chosen.feature
    where feature_labels.label = $label
        and feature_labels.is_report_split
),

partners as (
    select
        feature_a as feature,
        max(decoder_cos) as best_decoder_cos,
        arg_max(feature_b, coalesce(decoder_cos, -2)) as best_decoder_partner,
        max(exemplar_jaccard) as best_exemplar_jaccard,
        arg_max(feature_b, exemplar_jaccard) as best_exemplar_partner
    from feature_matches
    where run_a = $run
        and run_b = $other_run
    group by feature_a
),

final as (
    select
        detectors.run,
        detectors.feature,
        detectors.auroc,
        detectors.image_auroc,
        $other_run as other_run,
        partners.best_decoder_partner,
        partners.best_decoder_cos,
        partners.best_exemplar_partner,
        partners.best_exemplar_jaccard
    from detectors
    left join partners
        on detectors.feature = partners.feature
    where coalesce(partners.best_decoder_cos, -1) < $max_cos
        and coalesce(partners.best_exemplar_jaccard, 0) < $max_overlap
    order by
        detectors.auroc desc,
        detectors.feature
)

select * from final
