-- One row per (run, feature, label): how well the feature's code tells what carries the label,
-- at patch level (the code on a patch vs the patch's labels) and at image level (the image's
-- highest patch code vs the image's labels). AUROC comes from histograms (see saev_core.stats);
-- precision and recall are at the histogram threshold with the best F1, where "code >= threshold"
-- predicts the label (threshold 0: "code > 0").
with source as (
    select * from src_feature_labels
),

final as (
    select
        run,
        feature,
        label,
        auroc,
        mean_in,
        mean_out,
        mean_in - mean_out as mean_diff,
        n_pos,
        threshold,
        precision,
        recall,
        2 * precision * recall / nullif(precision + recall, 0) as f1,
        image_auroc,
        image_mean_in,
        image_mean_out,
        image_mean_in - image_mean_out as image_mean_diff,
        image_n_pos,
        image_threshold,
        image_precision,
        image_recall,
        2 * image_precision * image_recall / nullif(image_precision + image_recall, 0) as image_f1
    from source
)

select * from final
