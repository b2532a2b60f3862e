//! PNG line plots for the `sim` scenarios, drawn with plotters' bitmap backend.
//!
//! Labels need a TrueType font. It is read once from the system (DejaVu Sans, from the Debian
//! package `fonts-dejavu-core`; `OBNAM_PLOT_FONT` names another file) and registered with
//! plotters as `sans-serif`. Without one, plotting fails with a message that says what to
//! install; the tables and JSON do not need it.

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Where the font is looked for, in order.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// One line.
pub struct Series {
    /// Its legend entry.
    pub name: String,
    /// Its points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// A figure: a title, axes and lines.
pub struct Figure {
    /// The title.
    pub title: String,
    /// The x axis label.
    pub x_label: String,
    /// The y axis label.
    pub y_label: String,
    /// The x range.
    pub x: std::ops::Range<f64>,
    /// The y range.
    pub y: std::ops::Range<f64>,
    /// The lines.
    pub series: Vec<Series>,
}

fn font() -> Result<()> {
    static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("OBNAM_PLOT_FONT")
            .into_iter()
            .chain(FONTS.iter().map(|s| (*s).to_owned()))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the whole run: the bytes live as long.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{path} is not a usable TrueType font"));
            }
        }
        Err(format!(
            "no font for plot labels: install fonts-dejavu-core (apt-get install fonts-dejavu-core) or set OBNAM_PLOT_FONT; looked in {}",
            candidates.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `fig` into a 1000×650 PNG at `path` (its directory is created).
///
/// # Errors
/// No font, or the file cannot be written.
pub fn write_png(path: &Path, fig: &Figure) -> Result<()> {
    font()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1000, 650)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&fig.title, ("sans-serif", 24))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(fig.x.clone(), fig.y.clone())?;
        chart
            .configure_mesh()
            .x_desc(fig.x_label.as_str())
            .y_desc(fig.y_label.as_str())
            .label_style(("sans-serif", 15))
            .draw()?;
        for (i, s) in fig.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}
