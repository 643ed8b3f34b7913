-- How many distinct image labels each feature's exemplar images span, broadest first: a broad
-- feature fires on one thing across many kinds of image (the paper's abstract CLIP features), a
-- narrow one on one kind (DINOv2's visual features). Compare runs with the run parameter.
-- param run: stats run name; every run when omitted (default null)
-- param min_exemplars integer: leave out features with fewer labelled exemplars (default 2)
-- param limit integer: rows to return (default 20)
with selected as (
    select * from feature_breadth
    where ($run is null or run = $run)
        and n_labelled >= $min_exemplars
),

final as (
    select
        selected.run,
        selected.feature,
        selected.n_exemplars,
        selected.n_labels_spanned,
        selected.top_label,
        selected.top_label_share,
        selected.label_entropy,
        features.freq,
        features.max_act
    from selected
    left join features
        on selected.run = features.run
        and selected.feature = features.feature
    order by
        selected.n_labels_spanned desc,
        selected.label_entropy desc,
        selected.run,
        selected.feature
    limit $limit
)

select * from final
