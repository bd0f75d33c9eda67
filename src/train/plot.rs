//! Loss curves drawn as SVG (plotters), one or more named series on shared axes.

use std::path::Path;

use plotters::prelude::*;

use crate::model::error::ModelError;

/// One line: a name and (step, loss) points.
pub struct Series<'a> {
    /// Legend name.
    pub name: &'a str,
    /// Points.
    pub points: &'a [(f64, f64)],
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Draw `series` into an SVG file at `path` (written to a temp name, then renamed).
pub fn draw_loss_curves(path: &Path, title: &str, series: &[Series<'_>]) -> Result<(), ModelError> {
    draw_curves(path, title, "loss", series)
}

/// [`draw_loss_curves`] with another quantity (`y_label`) on the vertical axis.
pub fn draw_curves(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> Result<(), ModelError> {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        if y.is_finite() {
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if !y0.is_finite() {
        return Err(ModelError::invalid(
            path.display().to_string(),
            "no finite loss to plot",
        ));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let tmp = path.with_extension("svg.tmp");
    let draw_err = |e: String| ModelError::invalid(path.display().to_string(), e);
    {
        let root = SVGBackend::new(&tmp, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| draw_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(y_label)
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| draw_err(e.to_string()))?
                .label(s.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}
