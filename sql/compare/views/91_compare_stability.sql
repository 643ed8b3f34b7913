-- One row per (backbone, pair of SAEs) of the stability step (saev_core.stability): `kind`
-- trained (two seeds), trained_vs_random (a trained SAE against an untrained one of its shape)
-- or random (two untrained ones); Hungarian-matched decoder cosine and the matched features'
-- activation correlation.
with source as (
    select * from src_seed_stability
),

final as (
    select
        regexp_extract(
            replace(filename, '\', '/'), '([^/]+)/stability/seed_stability\.parquet$', 1
        ) as backbone,
        kind,
        a,
        b,
        n_matched,
        mean_cos,
        cos_q10,
        cos_q50,
        cos_q90,
        mean_corr,
        corr_q50,
        frac_corr_defined,
        random_cosine_scale
    from source
)

select * from final
