## Shared pieces of the HTML reports.  Every ${…} is HTML-escaped (the lookup's default filter); numbers are
## formatted in Python.
<%def name="timeline(t)">\
<div class='legend' aria-label='${t["title"]}'>\
% for kind, colour in t["kinds"]:
<span style='background:${colour}'></span>${kind}\
% endfor
</div><div class='timeline' role='img' aria-label='${t["title"] or "timeline"}'>\
% for lane in t["lanes"]:
<div class='label' title='${lane["label"]}'>${lane["label"]}</div><div class='lane'>\
% for b in lane["bars"]:
<div style='left:${b["left"]};width:${b["width"]};background:${b["colour"]}' title='${b["kind"]} ${lane["label"]}: ${b["took"]}'></div>\
% endfor
</div><div class='took'>${lane["took"]}</div>
% endfor
<div></div><div class='axis'><span>0 s</span><span>${t["total"]}</span></div><div></div></div>\
</%def>

<%def name="segments(segs)">\
% for g in segs:
<div class='seg ${g["kind"]}' style='left:${g["left"]};width:${g["width"]}' title='${g["title"]}'></div>\
% endfor
</%def>

<%def name="table_bars(rows)">\
% for r in rows:
<tr><td>${r["target"]}<br><span class='verdict ${r["verdict"]}' style='font-size:11px'>${r["status"]}</span></td>\
<td style='width:55%'><div class='track src'>${segments(r["source"])}</div><div class='track'>${segments(r["parts"])}</div>\
% if r["zoom"]:
<div class='zoom'>the last ${r["zoom"]["window"]} rows, ×${r["zoom"]["factor"]}:</div>\
<div class='track src'>${segments(r["zoom"]["source"])}</div><div class='track'>${segments(r["zoom"]["parts"])}</div>\
% endif
</td><td class='n'>source ${r["source_rows"]}<br>target ${r["target_rows"]}\
% for w in r["words"]:
<br>${w}\
% endfor
</td></tr>
% endfor
</%def>
