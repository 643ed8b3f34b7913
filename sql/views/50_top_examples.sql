-- One row per (run, feature, rank): the images whose highest patch code is largest, with the
-- patch where it peaks and, when the activation set's images.parquet is there, the image itself.
with examples as (
    select * from src_top_examples
),

runs as (
    select
        run,
        activations,
        n_prefix_tokens
    from runs
),

images as (
    select
        activations,
        image_id,
        split,
        path,
        labels
    from images
),

final as (
    select
        examples.run,
        examples.feature,
        examples.rank,
        examples.image_id,
        examples.token,
        examples.token - runs.n_prefix_tokens as patch,
        examples.value,
        images.split,
        images.path,
        images.labels as image_labels
    from examples
    left join runs
        on examples.run = runs.run
    left join images
        on runs.activations = images.activations
        and examples.image_id = images.image_id
)

select * from final
