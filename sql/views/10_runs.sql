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
        -- dense: fires on more than 10 x the mean firing rate (L0 / d_sae); _abs: on more than
        -- 1% of tokens (see saev_core.training.dense_fractions)
        dense_frac,
        dense_frac_abs,
        manifest_sha256,
        -- the tokens the stats streamed (the SAE's training policy: all, patches or prefix) and
        -- whether token 0 is CLS (from the shard manifest)
        tokens,
        has_cls,
        -- the splits streamed (comma-separated); a label's feature is chosen on select_split and
        -- its scores are reported on report_split
        splits,
        select_split,
        report_split,
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
