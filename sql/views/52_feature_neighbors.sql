-- One row per (run, feature, rank): the feature's nearest other features of the same SAE by
-- cosine of their decoder directions (rank 1 = most similar).
with source as (
    select * from src_neighbors
),

final as (
    select
        run,
        feature,
        rank,
        neighbor,
        cosine
    from source
)

select * from final
