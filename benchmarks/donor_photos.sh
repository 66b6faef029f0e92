#!/usr/bin/env bash
# Real photographs unrelated to any query, for distractor donors and calibration: the photo wallpapers of Debian's
# background packages (drawings and renders left out by name), installed with apt-get and copied into DIR with a
# manifest DIR/photos.csv (file,group,source,source_version,source_path). Never committed; needs root for apt-get.
#
#   benchmarks/donor_photos.sh DIR
set -euo pipefail
out=${1:?usage: donor_photos.sh DIR}
mkdir -p "$out/photos"
pkgs=(plasma-workspace-wallpapers mate-backgrounds ukui-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The photographs (looked at one by one): KDE wallpaper folders, then files of /usr/share/backgrounds.
kde=(BytheWater ColdRipple ColorfulCups DarkestHour EveningGlow FallenLeaf Grey Kite OneStandsOut Path Volna summer_1am)
files=(Bridge_by_Sander_Klootwijk.jpg Dragonfly_by_Bolly.jpg Kleiber_by_Lukas_Baubkus.jpg Picture_0B_by_freespace.jpg
  Picture_1A_by_freespace.jpg Wine_by_Jakkub_Mede.jpg aitzgorri_by_Aitzol_Berasategi.jpg
  analogpattern_by_Peter_Nerlich.jpg free_by_Peter_Nerlich.jpg friends_by_Aitzol_Berasategi.jpg
  greentock_by_Peter_Nerlich.jpg life_by_Aitzol_Berasategi.jpg picosdeeuropa_by_Aitzol_Berasategi.jpg
  seeding_by_Clements_Engelhardt.jpg sunset_by_Aitzol_Berasategi.jpg Infinite-Sea_by_Aury88.jpg
  mate/nature/Aqua.jpg mate/nature/Blinds.jpg mate/nature/Dune.jpg mate/nature/FreshFlower.jpg
  mate/nature/Garden.jpg mate/nature/GreenMeadow.jpg mate/nature/LadyBird.jpg mate/nature/RainDrops.jpg
  mate/nature/Storm.jpg mate/nature/TwoWings.jpg mate/nature/Wood.jpg mate/nature/YellowFlower.jpg)
sources=()
for k in "${kde[@]}"; do  # the largest of the folder's resolutions (one image a wallpaper)
  sources+=("$(ls -S /usr/share/wallpapers/"$k"/contents/images/* | head -n 1)")
done
for f in "${files[@]}"; do sources+=("/usr/share/backgrounds/$f"); done
manifest="$out/photos.csv"
echo "file,group,source,source_version,source_path" >"$manifest"
for src in "${sources[@]}"; do
  pkg=$(dpkg -S "$src" | head -n 1 | cut -d: -f1)
  version=$(dpkg-query -W -f='${Version}' "$pkg")
  case "$src" in
    /usr/share/wallpapers/*) name=$(echo "$src" | cut -d/ -f5) ;;
    *) name=$(basename "${src%.*}") ;;
  esac
  name=$(echo "$name" | tr -c 'A-Za-z0-9_\n-' '_')
  dest="photos/${pkg}__${name}.${src##*.}"
  cp -f "$src" "$out/$dest"
  echo "$dest,photo_${name},Debian package $pkg,$version,$src" >>"$manifest"
done
echo "donor_photos: $(($(wc -l <"$manifest") - 1)) photographs in $manifest"
