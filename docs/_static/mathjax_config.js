// MathJax 3 typesets the math nodes Sphinx and MyST write (class "math"),
// and marks the page when it is done: tests/test_docs.py waits for that mark.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore|mathjax_ignore|document",
    processHtmlClass: "tex2jax_process|mathjax_process|math|output_area",
  },
  startup: {
    pageReady() {
      return MathJax.startup.defaultPageReady().then(() => {
        document.documentElement.dataset.mathjax = "typeset";
      });
    },
  },
};
