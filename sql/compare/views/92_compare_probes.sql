-- One row per (backbone, probe label) of the probe step (saev_core.compare_probes): the linear
-- classification probe on the backbone's output (trained on train) scored on the test split,
-- with the percentile bootstrap 95% CI of its AUROC over the test images. A label
-- "circle:word" has concept circle and form word; a bare concept ("red") has form null, a bare
-- form ("word": some object drawn as a word) has concept null. The backbone is the directory the
-- file lies in, as in the other compare views (the stats run of the same name).
with source as (
    select * from src_probe_labels
),

final as (
    select
        regexp_extract(
            replace(filename, '\', '/'), '([^/]+)/probes/labels\.parquet$', 1
        ) as backbone,
        label,
        concept,
        form,
        split,
        n_images,
        n_pos,
        accuracy,
        balanced_accuracy,
        auroc,
        auroc_lo,
        auroc_hi
    from source
)

select * from final
