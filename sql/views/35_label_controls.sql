-- One row per (run, split, label): the best AUROC any feature of the run reaches when the label
-- is shuffled across the split's images (each image's mask moving with it; saev_core.stats_splits).
-- It is what picking the best of d_sae features reaches by chance, and grows with d_sae: a
-- leader's AUROC means something only by its margin over this.
with source as (
    select * from src_label_controls
),

final as (
    select
        run,
        split,
        label,
        d_sae,
        control_auroc,
        control_image_auroc
    from source
)

select * from final
