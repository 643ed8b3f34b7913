-- One row per (run, split, label): the best AUROC any feature of the run reaches when the label
-- is shuffled across the split's images (each image's mask moving with it; saev_core.stats.splits).
-- It is what picking the best of d_sae features reaches by chance, and grows with d_sae: a
-- leader's AUROC means something only by its margin over this. control_auroc_err is the proven
-- bound on that control's own error from the features' auroc_err: the exact maximum lies within
-- control_auroc +- control_auroc_err (0: every AUROC exact).
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
        control_auroc_err,
        control_image_auroc,
        control_image_auroc_err
    from source
)

select * from final
