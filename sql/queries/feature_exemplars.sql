-- The top images of one feature, best first: the patch where each peaks (for the heat map), the
-- value there, and the image's file and labels when its activation set is in the warehouse.
-- param run: stats run name, e.g. topk_k16
-- param feature integer: feature index
with selected as (
    select * from top_examples
    where run = $run
        and feature = $feature
),

final as (
    select
        rank,
        image_id,
        token,
        patch,
        value,
        split,
        path,
        image_labels
    from selected
    order by rank
)

select * from final
