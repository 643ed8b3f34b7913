-- One row per (run, label): the feature with the highest patch AUROC for the label (with its
-- scores) and the one with the highest image AUROC (ties: the lower feature index). Precomputed,
-- so that "which feature is this concept's?" is a look-up.
with scored as (
    select
        run,
        label,
        feature,
        auroc,
        image_auroc,
        mean_in,
        mean_out,
        n_pos
    from feature_labels
),

patch_best as (
    select
        run,
        label,
        arg_max(
            {
                'feature': feature,
                'image_auroc': image_auroc,
                'mean_in': mean_in,
                'mean_out': mean_out,
                'n_pos': n_pos
            },
            [auroc, -feature]
        ) as best,
        max(auroc) as auroc
    from scored
    where auroc is not null
    group by all
),

image_best as (
    select
        run,
        label,
        arg_max(feature, [image_auroc, -feature]) as image_feature,
        max(image_auroc) as image_auroc
    from scored
    where image_auroc is not null
    group by all
),

labels as (
    select distinct
        run,
        label
    from scored
),

final as (
    select
        labels.run,
        labels.label,
        patch_best.best.feature as feature,
        patch_best.auroc,
        -- the patch-best feature's other scores
        patch_best.best.image_auroc as feature_image_auroc,
        patch_best.best.mean_in as mean_in,
        patch_best.best.mean_out as mean_out,
        patch_best.best.n_pos as n_pos,
        image_best.image_feature,
        image_best.image_auroc
    from labels
    left join patch_best
        on labels.run = patch_best.run
        and labels.label = patch_best.label
    left join image_best
        on labels.run = image_best.run
        and labels.label = image_best.label
)

select * from final
