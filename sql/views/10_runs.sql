-- One row per stats run: the SAE, its training metrics and the shards the stats were measured on.
with source as (
    select * from src_runs
),

final as (
    select
        run,
        sae_dir,
        shard_dir,
        -- name of the activation set (the directory under artifacts/activations/), ignoring a
        -- trailing hive partition such as layer=2: the key that joins runs to images
        regexp_extract(
            regexp_replace(replace(shard_dir, '\', '/'), '(/[^/]*=[^/]*)*/*$', ''),
            '[^/]*$'
        ) as activations,
        backbone,
        layer,
        arch,
        d_model,
        d_sae,
        k,
        l0,
        fvu,
        dead_frac,
        dense_frac,
        manifest_sha256,
        n_tokens,
        n_images,
        -- CLS + register tokens before the patches: patch index = token - n_prefix_tokens
        n_prefix_tokens,
        -- edges of the non-zero bins of features.hist (bin 0 of hist counts exact zeros)
        hist_edges,
        -- the patch grid: patch p sits at row p // grid_cols, column p % grid_cols
        grid_rows,
        grid_cols,
        cfg_json
    from source
)

select * from final
