-- One row per image of every activation set, with its split, file and image-level labels.
with source as (
    select * from src_images
),

final as (
    select
        regexp_extract(replace(filename, '\', '/'), '([^/]+)/images\.parquet$', 1) as activations,
        image_id,
        split,
        path,
        labels,
        len(labels) as n_labels
    from source
)

select * from final
