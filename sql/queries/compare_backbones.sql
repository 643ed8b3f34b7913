-- The backbone comparison (warehouse/compare.duckdb): per backbone x concept x form, the SAE
-- feature with the best image-level AUROC on the select split (val), its AUROC on the report
-- split (test) with the percentile bootstrap 95% CI over the test images (the baselines step's
-- `sae` rows), beside the best AUROC any feature reaches on the label shuffled across images
-- (control_image_auroc: chance for the best of d_sae features, same split). Ordered so that
-- the backbones line up per concept and form.
-- param backbone: one backbone (a key of compare.backbones); every backbone when omitted (default null)
-- param form: one form (filled, outline, word); every form when omitted (default null)
with sae as (
    select * from compare_baselines
    where method = 'sae'
        and form is not null
        and ($backbone is null or backbone = $backbone)
        and ($form is null or form = $form)
),

final as (
    select
        sae.backbone,
        sae.concept,
        sae.form,
        sae.unit as feature,
        sae.auroc_val,
        sae.auroc_test,
        sae.ci_lo,
        sae.ci_hi,
        controls.control_image_auroc,
        sae.n_test_images,
        sae.n_test_pos
    from sae
    left join label_controls as controls
        on controls.run = sae.backbone
        and controls.split = sae.report_split
        and controls.label = sae.label
)

select * from final
order by concept, form, backbone
