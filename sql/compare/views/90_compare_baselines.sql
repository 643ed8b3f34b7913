-- One row per (backbone, method, concept) of the baselines step (saev_core.baselines): the
-- method's best unit by image-level AUROC on the select split (val), its AUROC on the report
-- split (test) and the percentile bootstrap CI over the report split's images (the same draws
-- for every method: methods compare paired; diff_lo/diff_hi/diff_p are the method's AUROC
-- minus the SAE's on those draws, null on the SAE's own rows). A concept label "circle:word" is split into its
-- concept and form; a plain concept ("circle") or form ("word") label has form null.
with source as (
    select * from src_baselines
),

final as (
    select
        regexp_extract(replace(filename, '\', '/'), '([^/]+)/baselines\.parquet$', 1) as backbone,
        method,
        concept as label,
        split_part(concept, ':', 1) as concept,
        case when contains(concept, ':') then split_part(concept, ':', 2) end as form,
        unit,
        sign,
        auroc_val,
        auroc_test,
        lo as ci_lo,
        hi as ci_hi,
        diff_lo,
        diff_hi,
        diff_p,
        n_units,
        n_test_images,
        n_test_pos,
        select_split,
        report_split
    from source
)

select * from final
