-- One row per (run, feature) with exemplars: how many distinct image labels its exemplar images
-- span (semantic breadth; the paper contrasts CLIP's abstract features with DINOv2's visual ones),
-- and how concentrated they are on one label.
with examples as (
    select
        run,
        feature,
        image_labels
    from top_examples
),

n_examples as (
    select
        run,
        feature,
        count(*) as n_exemplars,
        count(image_labels) as n_labelled
    from examples
    group by all
),

mentions as (
    select
        run,
        feature,
        unnest(image_labels) as label
    from examples
    where image_labels is not null
),

label_counts as (
    select
        run,
        feature,
        label,
        count(*) as n
    from mentions
    group by all
),

ranked as (
    select
        run,
        feature,
        label,
        n,
        n / sum(n) over (partition by run, feature) as share_of_mentions,
        row_number() over (partition by run, feature order by n desc, label) as label_rank
    from label_counts
),

spread as (
    select
        run,
        feature,
        count(*) as n_labels_spanned,
        max(label) filter (where label_rank = 1) as top_label,
        max(n) as top_label_count,
        -- Shannon entropy (nats) of the label mentions over the exemplars, summed in label
        -- order: a float sum in the order the threads happen to finish differs in the last bits
        -- from one build to the next
        -sum(share_of_mentions * ln(share_of_mentions) order by label) as label_entropy
    from ranked
    group by all
),

final as (
    select
        n_examples.run,
        n_examples.feature,
        n_examples.n_exemplars,
        n_examples.n_labelled,
        coalesce(spread.n_labels_spanned, 0) as n_labels_spanned,
        spread.top_label,
        -- share of the labelled exemplars that carry the most common label
        spread.top_label_count / nullif(n_examples.n_labelled, 0) as top_label_share,
        spread.label_entropy
    from n_examples
    left join spread
        on n_examples.run = spread.run
        and n_examples.feature = spread.feature
)

select * from final
