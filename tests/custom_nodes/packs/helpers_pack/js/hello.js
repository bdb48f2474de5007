console.log("helpers_pack extension");
