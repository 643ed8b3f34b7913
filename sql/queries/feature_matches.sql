-- The partners of one feature in the other runs: by decoder cosine and by exemplar overlap
-- (Jaccard of the top-image sets), best first.
-- param run: stats run name of the feature
-- param feature integer: feature index
with selected as (
    select * from feature_matches
    where run_a = $run
        and feature_a = $feature
),

final as (
    select
        run_b,
        feature_b,
        decoder_cos,
        exemplar_jaccard,
        decoder_rank,
        exemplar_rank
    from selected
    order by
        run_b,
        decoder_cos desc nulls last,
        exemplar_jaccard desc,
        feature_b
)

select * from final
