-- The backbone comparison (warehouse/compare.duckdb): per backbone x concept x form, the linear
-- classification probe's AUROC on the test split (trained on the backbone's output over the
-- train split; saev_core.compare_probes) with the percentile bootstrap 95% CI over the test
-- images, its balanced accuracy at threshold 0.5 and the number of positive test images; the
-- probe's counterpart of compare_backbones' best SAE feature. Only the "<concept>:<form>"
-- labels (the compare_probes view also holds the bare concepts and forms). Ordered so that the
-- backbones line up per concept and form.
-- param backbone: one backbone (a key of compare.backbones); every backbone when omitted (default null)
-- param form: one form (filled, outline, word); every form when omitted (default null)
with probes as (
    select * from compare_probes
    where concept is not null
        and form is not null
        and ($backbone is null or backbone = $backbone)
        and ($form is null or form = $form)
),

final as (
    select
        backbone,
        concept,
        form,
        auroc,
        auroc_lo,
        auroc_hi,
        balanced_accuracy,
        n_pos,
        n_images,
        accuracy,
        split
    from probes
)

select * from final
order by concept, form, backbone
