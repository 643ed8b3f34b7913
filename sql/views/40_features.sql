-- One row per (run, feature): how often and how strongly it fires, and its activation histogram.
with source as (
    select * from src_features
),

final as (
    select
        run,
        feature,
        freq,
        freq_images,
        freq_cls,
        freq_patches,
        n_fires,
        mean_act,
        max_act,
        log10_freq,
        log10_mean_act,
        n_fires = 0 as is_dead,
        -- dense: fires on more than 10 x the run's mean firing rate (L0 / d_sae, k / d_sae for
        -- TopK), so that runs of any k and width compare; is_dense_abs: on more than 1% of tokens
        -- (the paper's rule, which a TopK SAE with k / d_sae near 1% meets by arithmetic alone)
        freq > 10 * avg(freq) over (partition by run) as is_dense,
        freq > 0.01 as is_dense_abs,
        hist,
        -- where it fires on the patch grid (patch units): mean position, rms distance from it,
        -- and entropy of the positions / log(#positions) (0 = one place, 1 = everywhere alike)
        centroid_row,
        centroid_col,
        spatial_std,
        spatial_entropy,
        -- firing count per patch position, row-major
        spatial
    from source
)

select * from final
