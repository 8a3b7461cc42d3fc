//! cgroup paths of every kubelet layout map to their pod and container; a scan of a directory
//! tree built like kubelet's finds them by inode number, as the kernel reports cgroup ids.

use std::os::unix::fs::MetadataExt;

use runwarden_agent::cgroups::{CgroupIndex, Qos, Runtime, parse};

const UID: &str = "0f7c3a1e-5b2d-4c8e-9a6f-1d2e3f4a5b6c";
const CID: &str = "3b1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a19";

#[test]
fn systemd_driver_paths_of_each_qos_class() {
    let u = UID.replace('-', "_");
    let cases = [
        (format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"), Qos::Guaranteed),
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
            ),
            Qos::Burstable,
        ),
        (
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
            ),
            Qos::BestEffort,
        ),
    ];
    for (path, qos) in cases {
        let p = parse(&path).unwrap_or_else(|| panic!("{path}"));
        assert_eq!(p.pod_uid, UID);
        assert_eq!(p.qos, qos, "{path}");
        assert_eq!(p.container_id.as_deref(), Some(CID));
        assert_eq!(p.runtime, Some(Runtime::Containerd));
        assert!(!p.nested);
    }
}

#[test]
fn cgroupfs_driver_and_other_runtimes() {
    let p = parse(&format!("/kubepods/burstable/pod{UID}/{CID}")).unwrap();
    assert_eq!((p.qos, p.container_id.as_deref(), p.runtime), (Qos::Burstable, Some(CID), Some(Runtime::Unknown)));
    assert_eq!(p.pod_path, format!("/kubepods/burstable/pod{UID}"));
    let p = parse(&format!("/kubepods/pod{UID}/{CID}")).unwrap();
    assert_eq!(p.qos, Qos::Guaranteed);
    let u = UID.replace('-', "_");
    let p = parse(&format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{CID}.scope")).unwrap();
    assert_eq!(p.runtime, Some(Runtime::CriO));
    let p = parse(&format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{CID}.scope")).unwrap();
    assert_eq!((p.pod_uid.as_str(), p.container_id), (UID, None), "conmon belongs to the pod, not a container");
    let p = parse(&format!("/kubepods.slice/kubepods-pod{u}.slice/docker-{CID}.scope")).unwrap();
    assert_eq!(p.runtime, Some(Runtime::Docker));
}

#[test]
fn nested_cgroups_belong_to_their_pod() {
    let u = UID.replace('-', "_");
    let path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope/docker/{}",
        "a".repeat(64)
    );
    let p = parse(&path).unwrap();
    assert_eq!(p.pod_uid, UID);
    assert_eq!(p.container_id.as_deref(), Some(CID));
    assert!(p.nested);
    // kind's layout: the kubepods tree under kubelet.slice, with a prefix on every name.
    let kind = format!(
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
    );
    let p = parse(&kind).unwrap();
    assert_eq!((p.pod_uid.as_str(), p.qos, p.container_id.as_deref()), (UID, Qos::BestEffort, Some(CID)));
}

#[test]
fn cgroups_outside_pods_are_not_pods() {
    for path in [
        "/",
        "/system.slice/sshd.service",
        "/user.slice/user-0.slice/session-1.scope",
        "/kubepods.slice/kubepods-burstable.slice",
        &format!("/system.slice/pod{UID}"),
        "/kubepods/burstable/podnot-a-uid",
    ] {
        assert_eq!(parse(path), None, "{path}");
    }
}

#[test]
fn a_scan_finds_pod_and_container_cgroups_by_inode() {
    let root = std::env::temp_dir().join(format!("runwarden-cgroups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let u = UID.replace('-', "_");
    let pod = root.join(format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"));
    let container = pod.join(format!("cri-containerd-{CID}.scope"));
    let nested = container.join("docker/inner");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::create_dir_all(root.join("system.slice/sshd.service")).unwrap();

    let index = CgroupIndex::scan(&root).unwrap();
    let id = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(index.get(id(&pod)).map(|p| (p.pod_uid.as_str(), p.container_id.clone())), Some((UID, None)));
    assert_eq!(index.get(id(&container)).and_then(|p| p.container_id.as_deref()), Some(CID));
    assert!(index.get(id(&nested)).is_some_and(|p| p.nested && p.pod_uid == UID));
    assert!(index.get(id(&root.join("system.slice/sshd.service"))).is_none());
    assert_eq!(index.len(), 4, "pod, container, docker, inner");

    // A pod that appears after a scan is found by the next one.
    let later =
        root.join(format!("kubepods.slice/kubepods-pod{}.slice", "1".repeat(8) + "_2222_3333_4444_" + &"5".repeat(12)));
    std::fs::create_dir_all(&later).unwrap();
    assert!(index.get(id(&later)).is_none());
    assert!(CgroupIndex::scan(&root).unwrap().get(id(&later)).is_some());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn the_rescanner_follows_pods_that_come_and_go() {
    use runwarden_agent::cgroups::Rescanner;
    use std::time::{Duration, Instant};
    let root = std::env::temp_dir().join(format!("runwarden-rescan-{}", std::process::id()));
    let pod = root.join(format!("kubepods/burstable/pod{UID}"));
    let container = pod.join(CID);
    std::fs::create_dir_all(&root).unwrap();
    let mut rescanner = Rescanner::new(&root, Duration::from_secs(10), Duration::from_millis(200));
    let t0 = Instant::now();
    assert!(rescanner.poll(t0, false).unwrap().unwrap().is_empty(), "the first poll scans");
    std::fs::create_dir_all(&container).unwrap();
    let id = std::fs::metadata(&container).unwrap().ino();
    assert!(rescanner.poll(t0 + Duration::from_secs(1), false).is_none(), "not due yet");
    assert!(rescanner.poll(t0 + Duration::from_millis(100), true).is_none(), "urgent, but too soon");
    let index = rescanner.poll(t0 + Duration::from_secs(1), true).unwrap().unwrap();
    assert_eq!(index.get(id).unwrap().pod_uid, UID, "a pod that started is found by an urgent rescan");
    std::fs::remove_dir(&container).unwrap();
    std::fs::remove_dir(&pod).unwrap();
    let index = rescanner.poll(t0 + Duration::from_secs(11), false).unwrap().unwrap();
    assert!(index.get(id).is_none(), "a pod that ended is gone after the periodic rescan");
    std::fs::remove_dir_all(&root).unwrap();
}
